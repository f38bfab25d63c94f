"""`make data-synth`: grow a small seed set into training data with a teacher model."""

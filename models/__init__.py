"""Candidate model cards (`models/cards/*.yaml`) and the store that provisions them."""

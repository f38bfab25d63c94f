"""Task-specific scorers, named by a task's `scorer: module:function` key."""

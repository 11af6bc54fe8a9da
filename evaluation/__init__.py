"""The eval harness: synthetic retrieval and long-context tasks generated in-process, runners, metrics and plots."""

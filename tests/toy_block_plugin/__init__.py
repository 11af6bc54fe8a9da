"""A block defined outside hybridzoo, as a user would write one: an ops file and a block file (see test_block_registry).
"""

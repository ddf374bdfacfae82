"""Reward functions for tests (a random tiny model never answers correctly, so the training
tests reward something it does vary: the number of distinct characters in its output)."""


def distinct_characters(response: str, row: dict, response_length: int) -> float:
    return len(set(response)) / 10.0

"""A user's own `models` package (the most common folder name in ML repos): ranksearch must not shadow it."""

OWNER = "user_project"

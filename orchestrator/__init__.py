"""Searches over rank-selection methods on Ray Tune: `run_search(spec) -> SearchResult`, reports, CLI."""

from .search import SearchResult, resume_search, run_search

__all__ = ["SearchResult", "resume_search", "run_search"]

"""Chaos suite: process kills, Redis restarts, dropped connections, lease steals (see conftest.py)."""

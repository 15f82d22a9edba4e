"""Compiled inner loops. The daemon checks API_VERSION at start so that a stale build is caught."""

API_VERSION = 1

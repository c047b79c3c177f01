"""Evaluation: the router and the experts through the serving engine, the TF-IDF baseline, the
stacked (route, answer, score) evaluation, and their reports."""

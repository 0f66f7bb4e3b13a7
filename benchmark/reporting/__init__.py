"""Reporting: the leaderboard generated from run records (ranking, tables, figures, the paper's figures beside
ours) and records as a pandas DataFrame. Reads records; runs nothing."""

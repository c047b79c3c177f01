"""Datasets: chat records on disk, the demo experts' public sources, routing datasets, splits and cards."""

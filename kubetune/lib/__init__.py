"""The library under the stages: data URIs, datasets, scoring, statistics, run keys. Imports no stage."""

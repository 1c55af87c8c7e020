"""End-to-end jobs, above every technique package (nothing below imports them).

`prune`, `evaluate`, `quantize` and `masks` are the jobs behind the commands of those names; `stages`
registers each as a typed recipe stage (kind "stage"), and `Recipe` runs a list of stages into one
directory with one provenance chain.
"""

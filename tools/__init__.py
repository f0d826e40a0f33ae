"""Command-line tools over the library: restore, evaluate, export and report (installed as
restormer-restore, -evaluate, -export, -report), and the model loading and image I/O they share."""

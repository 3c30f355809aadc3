"""The lowest layer shared by both sides (the coordinator's federation package and each site's site_node):
nothing here imports the rest of the project."""

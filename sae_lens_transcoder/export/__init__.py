"""Exporters from SAELens transcoders to other tools' file formats."""

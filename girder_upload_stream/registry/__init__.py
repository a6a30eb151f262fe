"""The registry files (OpenMSIStream's CSV tables) and what records them."""

"""What runs in an engine replica and how a loraplex application is assembled and started."""

"""Shared plumbing: logging, progress, metrics, file io, device and seeding."""

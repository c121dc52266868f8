"""Integrations on top of the SSA SDK (PDF and CMS signing through the SAM)."""

"""Small model builders for tests and demos (no model hub: everything is built offline)."""

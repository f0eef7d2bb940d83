"""Every option of every command, declared once."""

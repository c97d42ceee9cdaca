"""Model definitions ds4c traces (DeepSeek-V4 at any size)."""

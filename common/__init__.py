"""llama-xray's shared package: everything the numbered scripts have in common.

One module per concept; nothing runs on import.
"""

"""
Tests of kelpie_sdk.storage.
"""

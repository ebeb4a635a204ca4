"""guestagent"""

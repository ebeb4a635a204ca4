"""guestimage"""

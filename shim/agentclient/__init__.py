"""agentclient"""

"""Identities, roles and the one access policy that every HTTP route and DIMSE handler asks."""

"""The waypoint: L7 authorization, JWT, ext-authz (a later issue)."""

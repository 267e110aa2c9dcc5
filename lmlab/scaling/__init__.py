"""Scaling-law fits: power laws with an asymptote, joint (N, K) asymptotes, data efficiency."""

"""MAD: the Masked AutoDecoder vision generalist.

Network, sequence language, masked training and K-step masked decoding.
"""

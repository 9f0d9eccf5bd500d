"""Readers for the real data sets: IDX and Kaggle CSV images, House Prices, Tang poems."""

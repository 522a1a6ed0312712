"""What only training needs: finding and splitting the data, the dataset and its order, the
image cache, the augmentation, the schedules, the metrics it logs and the state that --resume
continues.
"""

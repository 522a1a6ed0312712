"""What using a trained model needs: reading and preprocessing images, loading weights, running
.onnx files without torch, classifying, and the pictures of what the network sees (Grad-CAM).
"""

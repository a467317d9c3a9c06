"""faceberry's on-device runtime: camera → BlazeFace → alignment → classifier → tracker → MQTT.

Nothing in this package imports TensorFlow: the Pi needs only a LiteRT (or tflite_runtime)
interpreter, numpy and OpenCV.
"""

__version__ = "0.1.0"

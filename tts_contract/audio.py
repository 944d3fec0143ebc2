"""The audio the model produces and the codec frames it is made of."""

SAMPLE_RATE = 24000  # Hz, mono float32 in [-1, 1]
SAMPLES_PER_FRAME = 1920  # one codec frame = 80 ms
FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE
FRAMES_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_FRAME  # 12.5
NUM_CODEBOOKS = 16  # codes per frame: code 0 from the talker, 1..15 from its code predictor
CODEBOOK_SIZE = 2048  # valid code values are 0..2047

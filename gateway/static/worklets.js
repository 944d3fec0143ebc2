// Audio worklets: a gapless player fed with Float32 chunks, a recorder for voice clips, and a speech detector for
// "Talk over it".

class PcmPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = [];      // Float32Arrays waiting to play
    this.offset = 0;       // read position in chunks[0]
    this.buffered = 0;     // samples waiting
    this.played = 0;
    this.epoch = 0;        // which utterance plays: each `clear` starts the next one...
    this.position = 0;     // ...whose samples played so far are counted here (its own audio clock)
    this.stalls = 0;       // times playback ran dry while an utterance was still streaming
    this.stalledSamples = 0;
    this.dry = false;
    this.streaming = false;
    this.sinceReport = 0;
    this.port.onmessage = ({data}) => {
      if (data instanceof Float32Array) {
        this.chunks.push(data);
        this.buffered += data.length;
        this.streaming = true;
      } else if (data.type === "end") {
        this.streaming = false;
      } else if (data.type === "clear") {
        this.epoch = data.epoch || 0;
        this.position = 0;
        this.chunks = [];
        this.offset = 0;
        this.buffered = 0;
        this.streaming = false;
        this.report();
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    while (written < out.length && this.chunks.length) {
      const chunk = this.chunks[0];
      const n = Math.min(out.length - written, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      if (this.offset === chunk.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    out.fill(0, written);
    this.buffered -= written;
    this.played += written;
    this.position += written;
    if (written < out.length && this.streaming) {
      if (!this.dry) this.stalls += 1;
      this.dry = true;
      this.stalledSamples += out.length - written;
    } else {
      this.dry = false;
    }
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 20) this.report(currentTime + out.length / sampleRate);
    return true;
  }

  report(time = currentTime) {
    this.sinceReport = 0;
    // `time`: the audio clock at `position` (the end of the block just rendered), so the page can tell where
    // playback is between reports
    this.port.postMessage({played: this.played, buffered: this.buffered, stalls: this.stalls,
                           stalledSamples: this.stalledSamples, epoch: this.epoch, position: this.position, time});
  }
}

class PcmRecorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.recording = true;
    this.port.onmessage = () => { this.recording = false; };
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (this.recording && channel && channel.length) this.port.postMessage(channel.slice());
    return this.recording;
  }
}

// Is someone speaking into the microphone? A plain energy detector, kept simple on purpose:
// - the input is cut into 20 ms frames and each frame's loudness is its RMS (root mean square of the samples);
// - the first 300 ms (15 frames) measure the room: the noise floor is the loudest of those frames, so the
//   microphone must be opened while the user is quiet (the page opens it when "Talk over it" is switched on);
// - a frame is loud when its RMS is above THRESHOLD_FACTOR x the floor (+12 dB) and above MIN_LEVEL (-40 dBFS:
//   a digitally silent floor does not make every breath speech);
// - SPEECH_FRAMES loud frames in a row (100 ms) are speech; QUIET_FRAMES quiet ones in a row (300 ms) end it.
// It posts {speaking} when that changes, and {level, floor, threshold} every LEVEL_FRAMES frames for the page's meter.
// The page asks the browser for echo cancellation, so the reply it plays through loudspeakers is not taken as
// the user talking.
const FRAME_S = 0.02;
const CALIBRATION_FRAMES = 15;
const THRESHOLD_FACTOR = 4;
const MIN_LEVEL = 0.01;
const SPEECH_FRAMES = 5;
const QUIET_FRAMES = 15;
const LEVEL_FRAMES = 5;

class SpeechDetector extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frameLength = Math.round(sampleRate * FRAME_S);
    this.sum = 0;          // sum of squares in the frame being measured
    this.count = 0;        // its samples so far
    this.frames = 0;       // frames measured
    this.floor = 0;
    this.threshold = Infinity;
    this.loud = 0;         // loud frames in a row
    this.quiet = 0;        // quiet frames in a row
    this.speaking = false;
    this.running = true;
    this.port.onmessage = () => { this.running = false; };
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        this.sum += channel[i] * channel[i];
        if (++this.count === this.frameLength) this.frame(Math.sqrt(this.sum / this.count));
      }
    }
    return this.running;
  }

  frame(rms) {
    this.sum = 0;
    this.count = 0;
    this.frames += 1;
    if (this.frames <= CALIBRATION_FRAMES) {
      this.floor = Math.max(this.floor, rms);
      if (this.frames === CALIBRATION_FRAMES) {
        this.threshold = Math.max(MIN_LEVEL, THRESHOLD_FACTOR * this.floor);
        this.port.postMessage({calibrated: true, floor: this.floor, threshold: this.threshold});
      }
      return;
    }
    if (rms > this.threshold) {
      this.loud += 1;
      this.quiet = 0;
    } else {
      this.quiet += 1;
      this.loud = 0;
    }
    const speaking = this.speaking ? this.quiet < QUIET_FRAMES : this.loud >= SPEECH_FRAMES;
    if (speaking !== this.speaking) {
      this.speaking = speaking;
      this.port.postMessage({speaking});
    }
    if (this.frames % LEVEL_FRAMES === 0) this.port.postMessage({level: rms, floor: this.floor, threshold: this.threshold});
  }
}

registerProcessor("pcm-player", PcmPlayer);
registerProcessor("pcm-recorder", PcmRecorder);
registerProcessor("speech-detector", SpeechDetector);

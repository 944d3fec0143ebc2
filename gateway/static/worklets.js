// Audio worklets: a gapless player fed with Float32 chunks, and a recorder for voice clips.

class PcmPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = [];      // Float32Arrays waiting to play
    this.offset = 0;       // read position in chunks[0]
    this.buffered = 0;     // samples waiting
    this.played = 0;
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
    if (written < out.length && this.streaming) {
      if (!this.dry) this.stalls += 1;
      this.dry = true;
      this.stalledSamples += out.length - written;
    } else {
      this.dry = false;
    }
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 20) this.report();
    return true;
  }

  report() {
    this.sinceReport = 0;
    this.port.postMessage({played: this.played, buffered: this.buffered, stalls: this.stalls,
                           stalledSamples: this.stalledSamples});
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

registerProcessor("pcm-player", PcmPlayer);
registerProcessor("pcm-recorder", PcmRecorder);

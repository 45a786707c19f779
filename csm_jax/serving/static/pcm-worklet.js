// AudioWorklet that forwards its input, downmixed to mono, to the main thread in blocks of `blockSize` samples.
// Options: {processorOptions: {blockSize}}. Messages out: Float32Array (transferred). Message in: "flush"
// posts what is buffered (possibly fewer samples) and then the string "flushed".

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.blockSize = Math.max(128, opts.blockSize | 0 || 4096);
    this.buffer = new Float32Array(this.blockSize);
    this.filled = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.post();
        this.port.postMessage("flushed");
      }
    };
  }

  post() {
    if (this.filled === 0) return;
    const out = this.buffer.slice(0, this.filled);
    this.filled = 0;
    this.port.postMessage(out, [out.buffer]);
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      const channels = input.length;
      const length = input[0].length;
      for (let i = 0; i < length; i++) {
        let sum = 0;
        for (let c = 0; c < channels; c++) sum += input[c][i];
        this.buffer[this.filled++] = sum / channels;
        if (this.filled === this.blockSize) this.post();
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);

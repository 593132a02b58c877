module.exports = class StreamReader {
  constructor() {
    throw new Error("@vates/stream-reader is not available here (not in the registry mirror)");
  }
};

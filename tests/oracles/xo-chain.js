// Makes CHILD (a VHD xo-vhd.js wrote) a differencing disk of PARENT with Xen Orchestra's
// vhd-lib (chain(): parent uuid, name and locator, as XO links a delta backup to its
// parent). usage: node xo-chain.js PARENT CHILD
const fs = require("fs");
const { chainVhd } = require("vhd-lib");

// the three calls of XO's remote handler that vhd-lib makes here, on local files
const handler = {
  async getSize(path) { return fs.statSync(path).size; },
  async read(path, buffer, position) {
    const fd = fs.openSync(path, "r");
    try { return { bytesRead: fs.readSync(fd, buffer, 0, buffer.length, position), buffer }; }
    finally { fs.closeSync(fd); }
  },
  async write(path, buffer, position) {
    const fd = fs.openSync(path, "r+");
    try { fs.writeSync(fd, buffer, 0, buffer.length, position); } finally { fs.closeSync(fd); }
  },
};

const [parent, child] = process.argv.slice(2);
chainVhd(handler, parent, handler, child, true).catch((e) => { console.error(e); process.exit(1); });

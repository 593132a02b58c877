// Writes a dynamic VHD with Xen Orchestra's vhd-lib (createReadableSparseStream), as XO
// exports a disk: usage: node xo-vhd.js RAW_INPUT VHD_OUTPUT. Every 64 KiB fragment that
// is not all zero is stored.
const fs = require("fs");
const { createReadableSparseStream } = require("vhd-lib");

async function main() {
  const [input, output] = process.argv.slice(2);
  const data = fs.readFileSync(input);
  const fragment = 64 * 1024;
  const addresses = [];
  for (let at = 0; at < data.length; at += fragment) {
    const piece = data.subarray(at, Math.min(at + fragment, data.length));
    if (piece.some((b) => b !== 0)) addresses.push(at);
  }
  async function* fragments() {
    for (const at of addresses) {
      const piece = Buffer.alloc(fragment);
      data.copy(piece, 0, at, Math.min(at + fragment, data.length));
      yield { logicalAddressBytes: at, data: piece };
    }
  }
  const stream = await createReadableSparseStream(data.length, fragment, addresses, fragments());
  await new Promise((resolve, reject) => {
    stream.pipe(fs.createWriteStream(output)).on("finish", resolve).on("error", reject);
    stream.on("error", reject);
  });
}
main().catch((e) => { console.error(e); process.exit(1); });

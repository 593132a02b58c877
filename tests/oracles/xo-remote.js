// Writes a Xen Orchestra backup remote with Xen Orchestra's own code: @xen-orchestra/fs's
// local handler (and its encryption), vhd-lib 4's VhdFile, VhdDirectory (with its chunk
// compression), aliases (VhdAbstract.createAlias) and chainVhd, laid out as XO's
// RemoteAdapter.writeVhd and IncrementalRemoteWriter lay them out.
//
// usage: node xo-remote.js SPEC.json
// SPEC: { root, encryptionKey (hex, optional), directory (bool), compression (optional),
//         backups: [ { vmDir, metadataName, metadata, disks: [ { path, raw, blocks,
//         parent (path of the previous backup's VHD, or null) } ] } ] }
// Each disk's VHD holds the 2 MiB blocks listed in `blocks` (all when null) of the raw
// state; one with a parent is chained to it (differencing), as XO chains a delta.
const fs = require("fs");
const path = require("path");
const { getHandler } = require("@xen-orchestra/fs");
// promise-toolbox as vhd-lib 4 has it (vhd-lib 0.7.2 brings an older one)
const { Disposable } = require(require.resolve("promise-toolbox", { paths: [require.resolve("vhd-lib-4")] }));
const {
  createReadableSparseStream,
  chainVhd,
  VhdAbstract,
  VhdDirectory,
  VhdFile,
} = require("vhd-lib-4");

const BLOCK = 2 * 1024 * 1024;

async function vhdStream(raw, blocks) {
  const size = fs.statSync(raw).size;
  const fd = fs.openSync(raw, "r");
  const all = [];
  for (let i = 0; i * BLOCK < size; i++) all.push(i);
  const list = blocks === null ? all : blocks;
  async function* fragments() {
    for (const i of list) {
      const data = Buffer.alloc(BLOCK);
      fs.readSync(fd, data, 0, BLOCK, i * BLOCK);
      yield { logicalAddressBytes: i * BLOCK, data };
    }
  }
  return createReadableSparseStream(size, BLOCK, list, fragments());
}

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2]));
  const remote = { url: "file://" + spec.root };
  if (spec.encryptionKey) remote.encryptionKey = Buffer.from(spec.encryptionKey, "hex").toString("latin1");
  const handler = getHandler(remote);
  await handler.sync();
  // a VHD file is parsed from plain storage (an encrypted remote cannot be read in parts)
  const scratch = getHandler({ url: "file://" + spec.root + ".work" });
  await scratch.sync();
  for (const backup of spec.backups) {
    for (const disk of backup.disks) {
      const stream = await vhdStream(disk.raw, disk.blocks);
      if (spec.directory) {
        // RemoteAdapter.writeVhd: the data in data/<uuid>.vhd beside, an alias in place
        const dataPath = `${path.dirname(disk.path)}/data/${disk.dataId}.vhd`;
        const tmp = `tmp-${disk.dataId}.vhd`;
        await scratch.outputStream(tmp, stream, { checksum: false });
        await Disposable.use(VhdFile.open(scratch, tmp), async (src) => {
          await src.readBlockAllocationTable();
          await Disposable.use(
            VhdDirectory.create(handler, dataPath, { compression: spec.compression || undefined }),
            async (dst) => {
              dst.header = src.header;
              dst.footer = src.footer;
              for await (const block of src.blocks()) await dst.writeEntireBlock(block);
              await dst.writeBlockAllocationTable();
              await dst.writeHeader();
              await dst.writeFooter();
            }
          );
        });
        await scratch.unlink(tmp);
        await VhdAbstract.createAlias(handler, disk.path, dataPath);
      } else {
        await handler.outputStream(disk.path, stream);
      }
      if (disk.parent) await chainVhd(handler, disk.parent, handler, disk.path, true);
    }
    await handler.outputFile(`${backup.vmDir}/${backup.metadataName}`, JSON.stringify(backup.metadata));
  }
  await handler.forget();
  await scratch.forget();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

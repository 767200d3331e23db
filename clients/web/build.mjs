// Bundle the inbox into dist/: index.html, style.css, one app.js (the library and libsodium inside)
// and stamp-worker.js (the library's stamp worker: app.js starts it from beside itself).
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, "dist");
await rm(dist, { recursive: true, force: true });
await mkdir(dist);
await build({
  entryPoints: {
    app: path.join(here, "src", "app.js"),
    "stamp-worker": path.join(here, "..", "js", "src", "stamp-worker.js"),
  },
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  minify: true,
  legalComments: "linked",
  outdir: dist,
  // The library's Node-only branches (worker_threads) are never taken in a browser.
  external: ["node:*"],
  logLevel: "warning",
});
for (const name of ["index.html", "style.css"]) await copyFile(path.join(here, "src", name), path.join(dist, name));
console.log(`built ${dist}`);

// Bundle the inbox into dist/: index.html, style.css and one app.js (the library and libsodium inside).
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, "dist");
await rm(dist, { recursive: true, force: true });
await mkdir(dist);
await build({
  entryPoints: [path.join(here, "src", "app.js")],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  minify: true,
  legalComments: "linked",
  outfile: path.join(dist, "app.js"),
  logLevel: "warning",
});
for (const name of ["index.html", "style.css"]) await copyFile(path.join(here, "src", name), path.join(dist, name));
console.log(`built ${dist}`);

// Node-only helpers: key files in the Python client's format (JSON, mode 0600).

import { open, readFile, stat } from "node:fs/promises";
import { Identity } from "./identity.js";
import { KeyFileError } from "./errors.js";

/**
 * Read a key file (as written by `meshrelay keygen`); refuses one that other users can access.
 * @param {string} path
 * @returns {Promise<Identity>}
 */
export async function loadIdentity(path) {
  let text;
  try {
    const st = await stat(path);
    if (process.platform !== "win32" && (st.mode & 0o077) !== 0) {
      throw new KeyFileError(`${path} is accessible by other users (mode ${(st.mode & 0o777).toString(8)}); run: chmod 600 ${path}`);
    }
    text = await readFile(path, "utf8");
  } catch (e) {
    if (e instanceof KeyFileError) throw e;
    throw new KeyFileError(`cannot read key file ${path}: ${/** @type {Error} */ (e).message}`);
  }
  let doc;
  try {
    doc = JSON.parse(text);
  } catch {
    throw new KeyFileError(`${path} is not a meshrelay key file (not JSON)`);
  }
  return Identity.fromJSON(doc);
}

/**
 * Write `identity` as a key file with mode 0600; refuses to replace an existing file unless `force`.
 * @param {Identity} identity
 * @param {string} path
 * @param {{force?: boolean}} [opts]
 */
export async function saveIdentity(identity, path, { force = false } = {}) {
  let fh;
  try {
    fh = await open(path, force ? "w" : "wx", 0o600);
  } catch (e) {
    throw new KeyFileError(`cannot write key file ${path}: ${/** @type {Error} */ (e).message}`);
  }
  try {
    await fh.chmod(0o600);
    await fh.writeFile(JSON.stringify(identity.toJSON(), null, 2) + "\n");
  } finally {
    await fh.close();
  }
}

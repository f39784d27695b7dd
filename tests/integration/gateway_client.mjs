// A gateway client in Node.js, written from docs/envelope.md and docs/gateway.md alone:
// built-in fetch and crypto, no npm package. It seals a request, submits it, waits for
// the job, checks and opens the sealed result, and prints {"job_id", "result"} as JSON.
//
// Environment: GATEWAY_URL, MAAS_TENANT, ROOT_SECRET_B64 (the tenant's 32-byte root
// secret), KEY_VERSION, MODEL, INPUT_JSON; optional PRIORITY (high|normal|low).
import crypto from "node:crypto";

const env = process.env;
const tenant = env.MAAS_TENANT;
const version = Number(env.KEY_VERSION);
const root = Buffer.from(env.ROOT_SECRET_B64, "base64");

function u32(n) { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; }
function u64(n) { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; }
function str8(s) {
  const b = Buffer.from(s, "utf8");
  if (b.length < 1 || b.length > 255) throw new Error("str8 length");
  return Buffer.concat([Buffer.from([b.length]), b]);
}
// docs/envelope.md section 2; docs/gateway.md "Bearer token"
function hkdf(label) {
  const info = Buffer.concat([Buffer.from(label), Buffer.from([0]), Buffer.from(tenant), Buffer.from([0]), u32(version)]);
  return Buffer.from(crypto.hkdfSync("sha256", root, Buffer.alloc(0), info, 32));
}
const keys = {
  requestEnc: hkdf("maas-worker/v1/request-enc"),
  resultEnc: hkdf("maas-worker/v1/result-enc"),
  mac: hkdf("maas-worker/v1/mac"),
};
const token = `${tenant}.${version}.${hkdf("maas-worker/v1/gateway-bearer").toString("base64url")}`;

// docs/envelope.md section 3: header || nonce || ciphertext || tag || mac
function seal(jobId, model, priority, plaintext, ttlMs) {
  const issued = Date.now();
  const fields = Buffer.concat([str8(tenant), str8(jobId), str8("maas.infer"), str8(model)]);
  const fixed = Buffer.alloc(25);
  fixed.writeUInt8(1, 0);            // version
  fixed.writeUInt8(1, 1);            // type: request
  fixed.writeUInt16BE(25 + fields.length, 2);
  fixed.writeUInt32BE(version, 4);
  fixed.writeBigUInt64BE(BigInt(issued), 8);
  fixed.writeBigUInt64BE(BigInt(issued + ttlMs), 16);
  fixed.writeUInt8({ high: 0, normal: 1, low: 2 }[priority], 24);
  const header = Buffer.concat([fixed, fields]);
  const nonce = crypto.randomBytes(12);
  const gcm = crypto.createCipheriv("aes-256-gcm", keys.requestEnc, nonce);
  gcm.setAAD(header);
  const ct = Buffer.concat([gcm.update(plaintext), gcm.final()]);
  const body = Buffer.concat([header, nonce, ct, gcm.getAuthTag()]);
  const mac = crypto.createHmac("sha256", keys.mac).update(body).digest();
  return { header, envelope: Buffer.concat([body, mac]) };
}

// docs/envelope.md sections 4 and 6: MAC first (constant time), then the binding, then GCM.
function openResult(sealed, jobId, requestHeader) {
  const body = sealed.subarray(0, sealed.length - 32);
  const mac = crypto.createHmac("sha256", keys.mac).update(body).digest();
  if (!crypto.timingSafeEqual(mac, sealed.subarray(sealed.length - 32))) throw new Error("invalid envelope");
  if (sealed[0] !== 1 || sealed[1] !== 2) throw new Error("invalid envelope");
  const headerLen = sealed.readUInt16BE(2);
  const header = sealed.subarray(0, headerLen);
  let at = 25;
  const strings = [];
  for (let i = 0; i < 4; i++) { const n = header[at]; strings.push(header.subarray(at + 1, at + 1 + n).toString("utf8")); at += 1 + n; }
  const requestHash = header.subarray(at, at + 32);
  const [hTenant, hJob] = strings;
  const expected = crypto.createHash("sha256").update(requestHeader).digest();
  if (hTenant !== tenant || hJob !== jobId || !requestHash.equals(expected)) throw new Error("invalid envelope");
  const nonce = sealed.subarray(headerLen, headerLen + 12);
  const tag = body.subarray(body.length - 16);
  const ct = body.subarray(headerLen + 12, body.length - 16);
  const gcm = crypto.createDecipheriv("aes-256-gcm", keys.resultEnc, nonce);
  gcm.setAAD(header);
  gcm.setAuthTag(tag);
  return JSON.parse(Buffer.concat([gcm.update(ct), gcm.final()]).toString("utf8"));
}

const auth = { Authorization: `Bearer ${token}` };
const jobId = crypto.randomUUID();
const { header, envelope } = seal(jobId, env.MODEL, env.PRIORITY || "normal", Buffer.from(env.INPUT_JSON), 300_000);
const submitted = await fetch(`${env.GATEWAY_URL}/v1/jobs`, {
  method: "POST",
  headers: { ...auth, "Content-Type": "application/octet-stream" },
  body: envelope,
});
if (submitted.status !== 202) throw new Error(`submit: ${submitted.status} ${await submitted.text()}`);
const location = submitted.headers.get("location");
let job;
for (let i = 0; i < 10; i++) {
  const resp = await fetch(`${env.GATEWAY_URL}${location}?wait=10`, { headers: auth });
  if (resp.status !== 200) throw new Error(`status: ${resp.status} ${await resp.text()}`);
  job = await resp.json();
  if (job.state !== "queued" && job.state !== "running") break;
}
if (job.state !== "completed") throw new Error(`job ended ${job.state} (${job.reason})`);
const result = openResult(Buffer.from(job.result, "base64"), jobId, header);
console.log(JSON.stringify({ job_id: jobId, result }));

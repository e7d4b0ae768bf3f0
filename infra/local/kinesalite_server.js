#!/usr/bin/env node
// Local Kinesis for citypulse: kinesalite on loopback only, LevelDB-durable.
//
// Started by infra/local/emulators.py (start_kinesalite). kinesalite's own CLI
// binds every interface; this wrapper exists so it listens on 127.0.0.1 only.
//
// Usage: node kinesalite_server.js --port <port> --path <leveldb dir>
'use strict'

const path = require('path')

function arg(name) {
  const i = process.argv.indexOf('--' + name)
  if (i < 0 || i + 1 >= process.argv.length) {
    console.error('missing --' + name)
    process.exit(2)
  }
  return process.argv[i + 1]
}

const port = Number(arg('port'))
const dbPath = path.resolve(arg('path'))

const server = require('kinesalite')({
  path: dbPath,
  // Streams are usable at once: local runs and tests should not wait out AWS's state machine.
  createStreamMs: 0,
  deleteStreamMs: 0,
  updateStreamMs: 0,
  // The default 10 would reject a provisioned template's larger ShardCount.
  shardLimit: 64,
})

server.on('error', (err) => {
  console.error('kinesalite failed: ' + err.message)
  process.exit(1)
})

// kinesalite rethrows a request's 'error' event (index.js: req.on('error', err => { throw err })),
// so a client killed mid-request (a `kill -9`ed poller) took the whole server down with
// ECONNRESET "aborted". Such a request either never reached kinesalite's handler (nothing
// written) or lost only its response with its client, as any lost response: it is logged and
// dropped. Any other uncaught error still ends the process.
process.on('uncaughtException', (err) => {
  if (err && err.code === 'ECONNRESET') {
    console.error('kinesalite: a client went away mid-request (' + err.message + '); ignored')
    return
  }
  console.error(err && err.stack ? err.stack : String(err))
  process.exit(1)
})

server.listen(port, '127.0.0.1', () => {
  const a = server.address()
  console.log('kinesalite listening at http://' + a.address + ':' + a.port + ' path=' + dbPath)
})

// Close LevelDB cleanly on a polite stop; a SIGKILL is survivable too (LevelDB's log is replayed).
function shutdown(signal) {
  server.close((err) => {
    if (err) console.error('close after ' + signal + ' failed: ' + err.message)
    process.exit(err ? 1 : 0)
  })
}
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))

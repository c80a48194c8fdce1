"""Deploy artifacts to devices: TVM RPC client helpers (`rpc`), the device-side RPC server
(`server`, needs no TVM compiler), the device package (`device`) and an emulated arm64
board under qemu for testing without hardware (`qemu`).

Submodules are imported on use: this package also ships to devices, where only `rpc`,
`server` and the runtime exist.
"""

"""The wire: OpenMSIStream's chunk format, config files, and producing files."""

"""The ways requests come in: the gRPC services, the HTTP app with its OpenAI routes, the call gate, request checks."""

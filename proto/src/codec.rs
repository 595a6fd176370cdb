//! The protobuf codec of every crewmesh RPC: prost, with smaller message buffers.
//!
//! tonic's default codec starts every request's and every response's encode and
//! decode buffer at 8 KiB; crewmesh's messages on the model path are a few hundred
//! bytes, and a model call allocates four such buffers. Buffers start at 1 KiB here
//! and grow as a message needs; nothing else changes, on the wire or in the API. With
//! the system allocator this took 0.5 % off the data plane's instructions per model
//! call (docs/performance.md).

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where each message buffer starts. Larger messages grow it (doubling).
pub const INITIAL_BUFFER_BYTES: usize = 1024;

/// How much a streaming encoder buffers before it yields (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// [`ProstCodec`] with [`INITIAL_BUFFER_BYTES`] buffers; the generated clients and
/// servers use it.
#[derive(Debug, Clone)]
pub struct MeshCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for MeshCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> Codec for MeshCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

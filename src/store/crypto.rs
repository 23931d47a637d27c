//! The encryption device's id: which device the crypto store's keys belong to, so a lost store
//! is told apart from a first start.

use diesel::prelude::*;

use super::schema::crypto_devices;
use super::{now, Conn, Store, StoreError};

impl Store {
    /// The device id the bot user's encryption device was created with, if any.
    pub async fn crypto_device(&self, user_id: String) -> Result<Option<String>, StoreError> {
        self.run(move |conn| {
            Ok(db!(conn, |c| crypto_devices::table
                .find(&user_id)
                .select(crypto_devices::device_id)
                .first::<String>(c)
                .optional())?)
        })
        .await
    }

    /// Records (or replaces) the bot user's encryption device.
    pub async fn set_crypto_device(
        &self,
        user_id: String,
        device_id: String,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            let now = now();
            db!(conn, |c| diesel::insert_into(crypto_devices::table)
                .values((
                    crypto_devices::user_id.eq(&user_id),
                    crypto_devices::device_id.eq(&device_id),
                    crypto_devices::created_at.eq(now),
                ))
                .on_conflict(crypto_devices::user_id)
                .do_update()
                .set((
                    crypto_devices::device_id.eq(&device_id),
                    crypto_devices::created_at.eq(now),
                ))
                .execute(c))?;
            Ok(())
        })
        .await
    }
}
